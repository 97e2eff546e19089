from stalwart.cli.main import main

raise SystemExit(main())
