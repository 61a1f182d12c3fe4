import os
import sys

# builders.py lives beside the tests; make it importable whatever the invocation directory.
sys.path.insert(0, os.path.dirname(__file__))
