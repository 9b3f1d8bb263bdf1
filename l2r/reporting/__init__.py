"""The comparison report of an attribution output: `report` (the driver: summary.md, summary.json,
report.html, summary.png), `stats` (statistics and tables), `images` (colours, overlays, gallery),
`html` and `png` (the two renderings). No Ray: `l2r.report` and `jobs/report.py` call `report.write_report`."""
