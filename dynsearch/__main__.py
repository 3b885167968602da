from dynsearch.cli import main

raise SystemExit(main())
