"""Token mixers: one file each (paper equations, reference math, decoding step, parallel rules, SPECS)."""
