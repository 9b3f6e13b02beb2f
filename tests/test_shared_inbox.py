"""Two daemons on one inbox without Redis (issue 28, case 5): real processes, each with its
own SQLite cache; the claim file on the share keeps each source's fate to one owner."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import write_config
from tests.harness import Daemon, wait_for
from tests.test_daemon import synthetic

pytestmark = pytest.mark.slow

N = 14  # photos dropped at once (the issue dropped 30; 14 keep the run short)
OUTPUTS = [{"name": "master", "format": "png"}, {"name": "web", "format": "webp"}]


def machine(tmp_path: Path, models_dir: Path, name: str) -> Path:
    """One daemon's config: the shared inbox and outbox, a cache folder of its own."""
    # a file the other daemon holds is looked at again after claim_ttl_s / 2: 2 s, not 30,
    # so that both daemons are idle soon after the last file is done
    path = write_config(tmp_path, models_dir, cache={"dir": str(tmp_path / name / "cache")},
                        store={"claim_ttl_s": 4},
                        watch=[{"inbox": str(tmp_path / "inbox"),
                                "outbox": str(tmp_path / "outbox"),
                                "after_success": "move", "outputs": OUTPUTS}])
    (tmp_path / name).mkdir(exist_ok=True)
    return path.rename(tmp_path / name / "config.yaml")


def visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def test_two_daemons_with_their_own_sqlite_caches_lose_nothing(tmp_path, models_dir):
    a = Daemon(machine(tmp_path, models_dir, "a"), log=tmp_path / "a.log")
    b = Daemon(machine(tmp_path, models_dir, "b"), log=tmp_path / "b.log")
    names = [f"p{i:02d}.jpg" for i in range(N)]
    with a, b:
        for i, name in enumerate(names):
            tmp = tmp_path / "inbox" / f".{name}.part"
            tmp.write_bytes(synthetic(500 + i, size=160))
            tmp.rename(tmp_path / "inbox" / name)
        done = tmp_path / "done"
        wait_for(lambda: len(visible(done)) == N and not visible(tmp_path / "inbox"),
                 timeout=240)
        wait_for(lambda: all((s := d.status()) and s.get("state") == "idle" for d in (a, b)),
                 timeout=60)
    outputs = visible(tmp_path / "outbox")
    expected = sorted([tmp_path / "outbox" / "master" / f"{n}.png" for n in names]
                      + [tmp_path / "outbox" / "web" / f"{n}.webp" for n in names])
    assert outputs == expected, f"{2 * N - len(outputs)} outputs missing"
    assert sorted(p.name for p in visible(done)) == names
    events = a.events() + b.events()
    withdrawn = [e for e in events if e.get("event") == "processed"
                 and e.get("outcome") == "withdrawn"]
    assert not withdrawn, withdrawn
    delivered = Counter(e["path"] for e in events if e.get("event") == "processed"
                        and e.get("outcome") in ("exact", "pixel", "near", "miss"))
    assert set(delivered.values()) == {1} and len(delivered) == N, delivered
    assert a.processed() and b.processed(), "both daemons should share the work"
    assert not any(e.get("event") == "output_kept" for e in events)
    seen = [e for e in events if e.get("event") == "inbox_shared"]
    assert seen, "each daemon should say that another one watches its inbox"
