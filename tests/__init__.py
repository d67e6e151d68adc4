"""Test suite. A package, so that tests/test_export.py and tests/qat/test_export.py can share a basename."""
