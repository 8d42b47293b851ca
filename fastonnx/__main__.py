import sys

from fastonnx.cli import main

sys.exit(main())
