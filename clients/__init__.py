"""Generated stubs and client libraries.

The generated modules import each other as ``pagedserve.*`` (their proto package paths), so importing
this package puts ``clients/python`` on ``sys.path``: a checkout works from a plain PYTHONPATH.
"""

import os
import sys

_PYTHON_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python")
if _PYTHON_DIR not in sys.path:
    sys.path.append(_PYTHON_DIR)
