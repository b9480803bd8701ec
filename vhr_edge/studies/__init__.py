"""Studies: rerunnable drivers behind docs/ reports (not part of the `vhr-edge` command line).

- `mechanism`  issue 19: T-VHD at scale on the bundled files, and the ceiling of head
               reinforcement on the testbed (docs/mechanism.md); its runs in `mechanism_runs`,
               its tables and plots in `mechanism_report`
- `probe`      the teacher-forced oracle probe of single-head reinforcement (PyTorch)
"""
