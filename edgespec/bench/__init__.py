"""`edgespec bench`: configurations, the interleaved runner and its report, the prompt sets,
llama.cpp as the yardstick and its speculative peers, plots."""
