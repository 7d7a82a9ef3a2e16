import sys

from seqrec.data.prepare import main

sys.exit(main())
