import sys

from scm_fast.train.loop import main

sys.exit(main())
