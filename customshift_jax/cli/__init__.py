"""The `customshift` command line."""
