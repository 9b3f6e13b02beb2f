"""The long-running service (`rembgd run`): supervisor, intake, workers, watchers, status."""
