"""The DSVE-Loc network: image path, text path and their joint embedding."""
