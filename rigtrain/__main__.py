from rigtrain.cli import main

raise SystemExit(main())
