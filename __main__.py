from stalwart.runtime.cli import main

raise SystemExit(main())
