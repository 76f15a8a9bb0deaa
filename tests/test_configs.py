"""Configs: importable from the installed package, strict (locked) in Python too."""
import glob
import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if not p.endswith("__init__.py") and not p.endswith(("common.py", "models.py")))


@pytest.mark.parametrize("name", NAMES)
def test_every_config_is_locked(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.total_steps = 7  # an existing key: fine
  with pytest.raises(AttributeError, match="totl_steps"):
    config.totl_steps = 3
  with pytest.raises(AttributeError):
    config.data.pathh = "x"


def test_configs_import_from_the_package_outside_the_repository(tmp_path):
  code = ("from ip2p_jax.configs.tiny_ip2p import get_config\n"
          "from ip2p_jax.configs import models\n"
          "c = get_config()\n"
          "assert c.model.unet['in_channels'] == models.TINY_IP2P_UNET['in_channels']\n"
          "try:\n  c.totl_steps = 3\nexcept AttributeError:\n  print('strict')\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "strict"
