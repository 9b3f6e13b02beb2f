"""Start a throwaway Redis on 127.0.0.1:6379 if none answers (used by `make test`)."""
import shutil
import socket
import subprocess
import sys
import time


def redis_up(port: int = 6379) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


if __name__ == "__main__":
    if redis_up():
        sys.exit(0)
    server = shutil.which("redis-server")
    if server is None:
        print("ensure_redis: redis-server not installed; Redis tests will fail under CI", file=sys.stderr)
        sys.exit(0)
    subprocess.run([server, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
                    "--save", "", "--appendonly", "no"], check=False)
    for _ in range(50):
        if redis_up():
            print("ensure_redis: started redis-server on 127.0.0.1:6379")
            sys.exit(0)
        time.sleep(0.1)
    print("ensure_redis: redis-server did not come up", file=sys.stderr)
