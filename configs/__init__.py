"""The paper recipes as YAML (installed as ``fastgait.configs``)."""
