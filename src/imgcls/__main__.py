from imgcls.cli import main

raise SystemExit(main())
