"""Summary tables and figures from the stages' outputs."""
