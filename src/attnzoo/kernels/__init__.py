"""Shared compute paths: SDPA with attnzoo's conventions, log-sum-exp merging, blocked local attention."""
