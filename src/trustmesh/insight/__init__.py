"""Recorded traffic: normalized records, replay through the evaluator (``impact``) and
least-privilege policies proven by replay (``generate``)."""
