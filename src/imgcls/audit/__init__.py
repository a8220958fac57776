"""``imgcls audit``: near-duplicates, likely label errors, shortcuts and class balance of a data set."""
