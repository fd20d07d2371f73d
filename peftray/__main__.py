from peftray.cli import main

raise SystemExit(main())
