"""Analysis: reads RunResults only; one function per figure; predicted-vs-measured tables."""
