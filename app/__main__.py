from app.app import main

raise SystemExit(main())
