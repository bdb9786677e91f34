"""HTTP in: parse → normalize (provider shapes) → validate → accepted UsageReports."""
