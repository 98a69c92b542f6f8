from calibra.cli import main

raise SystemExit(main())
