"""What comes after pruning: FLOP counts, physical shrinking, plots."""
