"""workbench: record and explore what happens inside transformer inference."""
