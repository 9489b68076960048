"""Reports: the markdown text and the plots of evaluation, halting and the demo (design: reports read
what evaluation measured and write it; they measure nothing themselves)."""
