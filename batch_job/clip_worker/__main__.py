import sys

from clip_worker.runner import main

sys.exit(main())
