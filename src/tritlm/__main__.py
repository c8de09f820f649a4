from tritlm.cli import main

raise SystemExit(main())
