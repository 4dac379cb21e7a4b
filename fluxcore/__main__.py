from fluxcore.cli import main

raise SystemExit(main())
