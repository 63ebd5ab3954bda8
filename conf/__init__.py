# The YAML configs of every command, shipped inside the package as `pipeline.conf`
# (pipeline/conf links here); pipeline.config.conf_dir() finds them through importlib.resources.
