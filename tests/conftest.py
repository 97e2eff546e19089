import sys
from pathlib import Path

# The tests folder is not a package (the repository root is); make its helpers importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))
