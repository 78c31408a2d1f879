"""Example configs, shipped inside the package (shapline.configs) so `shapline demo` works from a wheel."""
