from fedsync.cli import main

raise SystemExit(main())
