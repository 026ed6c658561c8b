"""Leaves that import nothing of gptlab: the atomic write (files), the console and its log (console),
the stages' one-line errors (cli), signals, the device and dtype set-up (device, cpu_probe), and
torchrun's process group (distributed)."""
