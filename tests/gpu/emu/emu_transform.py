#!/usr/bin/env python3
"""Rewrites kernels/distattn.cu for the CPU emulation (cuda_emu.h): CUDA
headers out, launches as emu_launch calls, dynamic shared memory from the
emulated CTA.  usage: emu_transform.py IN OUT"""
import re
import sys

src = open(sys.argv[1]).read()
src = re.sub(r'#include <cuda_[a-z0-9_]+\.h>\n', '', src)
src = src.replace('extern __shared__ float4 smem4[];', 'float4 *smem4 = emu_cur->smem.data();')
src, n = re.subn(r'(\w+)<<<(.*?)>>>\((.*?)\);',
                 lambda m: 'emu_launch(%s, %s, %s);' % (m.group(1), m.group(2), m.group(3)),
                 src, flags=re.S)
if n == 0 or '<<<' in src or 'extern __shared__' in src:
    sys.exit('emu_transform: unexpected source shape')
open(sys.argv[2], 'w').write('#include "tests/gpu/emu/cuda_emu.h"\n' + src)
