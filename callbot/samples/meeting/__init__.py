"""The meeting sample (a package only so its tests and the other samples' can share a test run)."""
