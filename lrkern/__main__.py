from lrkern.cli import main

raise SystemExit(main())
