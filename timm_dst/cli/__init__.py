"""``timm-dst-train``: a timm-style training program with DST built in. Layer 4 (a front end)."""
