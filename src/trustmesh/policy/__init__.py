"""Policy model: selection and composition per workload, the evaluator, explanations.

Pure: nothing here reads files, the network or the clock.
"""
