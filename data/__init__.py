"""Dataset cards a user names with data=, shipped inside the package as detector.datacards."""
