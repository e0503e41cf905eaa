from rigtrain.cli import run

raise SystemExit(run())
