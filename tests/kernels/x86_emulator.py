"""Run leaf functions of the compiled kernel library on an emulated x86-64 CPU (Bochs, through
bochscpu-python), to test instruction-set routes this machine lacks (AVX-512 VNNI).

A guest is a bare long-mode CPU: the library's loadable segments are copied to guest memory at a
fixed base (its code is position independent; a leaf function reaches only its own code and
read-only constants), buffers are placed after it, the System V argument registers are set, and
the function returns to a ``hlt`` (which faults in user mode: the fault at that address is the
return). Bochs picks its CPU model (its CPUID, hence which instructions decode) once per process,
so every emulated call runs in a subprocess of its own: :func:`run_in_guest`.

The bochscpu-python wheel links two glibc 2.38 symbols (``__isoc23_strtoull`` / ``sscanf``); on an
older glibc a two-line shim compiled here supplies them.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

PAGE = 4096
# Bochs' CPU database indices (cpu.model) of the models the tests use, with the CPUID brand
# string each must report (checked in the guest, so a reordered database fails loudly)
MODELS = {
    "sapphire_rapids": (30, "Xeon(R) w9-3475X"),  # AVX-512 F/BW/VL/VNNI
    "cannon_lake": (27, "i3-8121U"),  # AVX-512 F/BW/VL, no VNNI
    "arrow_lake": (31, "Ultra 5 245K"),  # AVX2 / AVX-VNNI, no AVX-512
}
_SHIM = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
int __isoc23_sscanf(const char *s, const char *f, ...) {
    va_list ap; va_start(ap, f); int r = vsscanf(s, f, ap); va_end(ap); return r;
}
"""
# the CPUID brand string (leaves 0x80000002..4), for the model check
_BRAND = r"""
#include <cpuid.h>
void tt_emu_brand(unsigned *out) {
    for (unsigned i = 0; i < 3; i++)
        __cpuid(0x80000002u + i, out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3]);
}
"""


def _compile(src: str, out: Path, flags: list[str]) -> Path:
    from tritlm.kernels.cpu import build

    cc = build.find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler")
    if not out.exists():
        c = out.with_suffix(".c")
        c.write_text(src)
        subprocess.run([cc, *flags, "-o", str(out), str(c)], check=True, capture_output=True)
    return out


def unavailable(workdir: Path) -> str | None:
    """Why the emulator cannot run here (None: it can)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "the emulator harness runs on x86-64 Linux"
    try:
        import importlib.util

        if importlib.util.find_spec("bochscpu") is None:
            return "bochscpu-python is not installed"
    except (ImportError, ValueError):
        return "bochscpu-python is not importable"
    try:
        proc = subprocess.run([sys.executable, __file__, "--probe", str(workdir)], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return "the emulator did not start"
    if proc.returncode != 0:
        return f"the emulator does not start here: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
    return None


def _import_bochscpu(workdir: Path):
    try:
        import bochscpu  # noqa: F401
    except ImportError:
        shim = _compile(_SHIM, workdir / "isoc23_shim.so", ["-shared", "-fPIC", "-O2"])
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    import bochscpu
    import bochscpu.cpu
    import bochscpu.memory

    return bochscpu


def _set_model(bochscpu, index: int) -> None:
    """cpu.model is an enum parameter of Bochs' simulator interface; its value (an index into the
    CPU database) is the fourth 64-bit field after min / max / initial of bx_param_num_c."""
    import bochscpu._bochscpu as native

    lib = ctypes.CDLL(native.__file__)
    get = lib._ZN13bx_real_sim_c14get_param_enumEPKcP10bx_param_c
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    p = get(ctypes.c_void_p.in_dll(lib, "SIM").value, b"cpu.model", None)
    if not p:
        raise RuntimeError("Bochs has no cpu.model parameter")
    w = (ctypes.c_int64 * 18).from_address(p)
    if not (w[14] == 0 and w[15] >= 0 and 0 <= w[17] <= w[15]):
        raise RuntimeError(f"unexpected cpu.model parameter layout {list(w[14:18])}")
    w[15] = max(w[15], index)
    w[17] = index


class Guest:
    """One emulated CPU with identity-mapped guest memory (guest virtual == guest physical)."""

    def __init__(self, bochscpu, xcr0: int):
        self.b = bochscpu
        self.sess = bochscpu.Session()
        self.sess.missing_page_handler = self._missing
        self.pt = bochscpu.memory.PageMapLevel4Table()
        self.pages: dict[int, int] = {}
        self.brk = 0x4000_0000
        self.xcr0 = xcr0

    @staticmethod
    def _missing(gpa):
        raise RuntimeError(f"guest touched unmapped memory at {gpa:#x}")

    def map(self, addr: int, size: int) -> None:
        for p in range(addr // PAGE * PAGE, addr + max(size, 1), PAGE):
            if p not in self.pages:
                hva = self.b.memory.allocate_host_page()
                self.b.memory.page_insert(p, hva)
                self.pt.insert(p, p, 1)
                self.pages[p] = hva

    def write(self, addr: int, data: bytes) -> None:
        self.map(addr, len(data))
        off = 0
        while off < len(data):
            a = addr + off
            k = min(len(data) - off, PAGE - a % PAGE)
            ctypes.memmove(self.pages[a - a % PAGE] + a % PAGE, data[off:off + k], k)
            off += k

    def read(self, addr: int, n: int) -> bytes:
        out = bytearray()
        while n > 0:
            k = min(n, PAGE - addr % PAGE)
            out += ctypes.string_at(self.pages[addr - addr % PAGE] + addr % PAGE, k)
            addr, n = addr + k, n - k
        return bytes(out)

    def put(self, array) -> int:
        """Copy a numpy array (C order) into fresh guest memory; its address."""
        import numpy as np

        return self.alloc(np.ascontiguousarray(array).tobytes())

    def alloc(self, data: bytes | int) -> int:
        n = data if isinstance(data, int) else len(data)
        a = (self.brk + PAGE - 1) // PAGE * PAGE
        self.brk = a + n + PAGE  # an unmapped page after each buffer: overruns fault
        self.map(a, n)
        if not isinstance(data, int):
            self.write(a, data)
        return a

    def load_elf(self, path: Path, base: int = 0x1000_0000) -> dict[str, int]:
        """Copy the PT_LOAD segments to ``base`` and return the function symbols' guest addresses."""
        b = Path(path).read_bytes()
        if b[:4] != b"\x7fELF" or b[4] != 2:
            raise ValueError(f"{path}: not a 64-bit ELF file")
        (phoff,) = struct.unpack_from("<Q", b, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", b, 0x36)
        for i in range(phnum):
            p_type, _, off, vaddr, _, filesz, memsz, _ = struct.unpack_from("<IIQQQQQQ", b, phoff + i * phentsize)
            if p_type == 1:
                self.map(base + vaddr, memsz)
                self.write(base + vaddr, b[off:off + filesz])
        (shoff,) = struct.unpack_from("<Q", b, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", b, 0x3A)
        secs = [struct.unpack_from("<IIQQQQIIQQ", b, shoff + i * shentsize) for i in range(shnum)]
        syms = {}
        for s in secs:
            if s[1] in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
                str_off = secs[s[6]][4]
                for j in range(s[5] // 24):
                    name, info, _, _, value, _ = struct.unpack_from("<IBBHQQ", b, s[4] + j * 24)
                    if value and info & 0xF == 2:  # STT_FUNC
                        end = b.index(b"\0", str_off + name)
                        syms.setdefault(b[str_off + name:end].decode(), base + value)
        return syms

    def call(self, fn: int, *args: int) -> int:
        """Run ``fn(*args)`` (integer / pointer arguments) to its return; returns rax."""
        stack = self.alloc(64 * 1024)
        halt = self.alloc(b"\xf4")
        # the return address, then arguments 7.. (System V: on the stack); 16-byte aligned before
        # the return address was pushed, as after a call
        sp = stack + 64 * 1024 - 8 * (len(args) + 8) & ~15
        self.write(sp - 8, struct.pack("<Q", halt) + b"".join(struct.pack("<Q", v) for v in args[6:]))
        pml4 = 0x7000_0000
        for hva, gpa in self.pt.commit(pml4):
            self.b.memory.page_insert(gpa, hva)
        st = self.b.State()
        self.b.cpu.set_long_mode(st)
        st.cr4 = st.cr4 | (1 << 18) | (1 << 10) | (1 << 9)  # OSXSAVE, OSXMMEXCPT, OSFXSR
        st.xcr0 = self.xcr0
        st.mxcsr, st.fpcw = 0x1F80, 0x037F  # the power-on / Linux defaults: FP exceptions masked
        st.cr3 = pml4
        st.rsp = sp - 8
        st.rip = fn
        for reg, v in zip(("rdi", "rsi", "rdx", "rcx", "r8", "r9"), args):
            setattr(st, reg, v)
        cs = self.b.Segment()
        cs.present, cs.selector, cs.base, cs.limit, cs.attr = True, 0x33, 0, 0xFFFFFFFF, 0x22FB
        ds = self.b.Segment()
        ds.present, ds.selector, ds.base, ds.limit, ds.attr = True, 0x2B, 0, 0xFFFFFFFF, 0xCF3
        st.cs, st.ds, st.ss, st.es, st.fs, st.gs = cs, ds, ds, ds, ds, ds
        self.sess.cpu.state = st
        fault = []

        def on_exception(sess, cpu_id, vector, error_code):
            fault.append((vector, error_code, sess.cpu.rip))
            sess.stop()

        hook = self.b.Hook()
        hook.exception = on_exception
        self.sess.run([hook])
        if not fault or fault[0][:1] != (13,) or not halt <= fault[0][2] <= halt + 1:
            desc = f"exception {fault[0][0]} (error {fault[0][1]}) at {fault[0][2]:#x}" if fault else "no return"
            raise RuntimeError(f"guest call failed: {desc}")
        return self.sess.cpu.state.rax


def run_in_guest(workdir: Path, model: str, lib: Path, job: dict, xcr0: int = 0xE7, timeout: float = 300) -> dict:
    """Run ``job`` (see :func:`_job`) in a fresh process on the emulated ``model``; returns its result."""
    spec = workdir / f"job-{os.getpid()}-{len(list(workdir.glob('job-*')))}.json"
    spec.write_text(json.dumps({"model": model, "lib": str(lib), "xcr0": xcr0, "job": job}))
    proc = subprocess.run([sys.executable, __file__, str(spec)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"emulator run failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _case_dots(guest: Guest, syms: dict, d: dict):
    """tt_vnni_dots: raw dots of ngroups 4-row groups and T tokens."""
    import numpy as np

    kb, ng, t = (int(v) for v in d["shape"])
    pd = guest.alloc(4 * t * 4 * ng)
    guest.call(syms["tt_vnni_dots"], guest.put(d["w"]), kb, ng, guest.put(d["x"]), d["x"].shape[1], t, pd, 4 * ng)
    return np.frombuffer(guest.read(pd, 4 * t * 4 * ng), dtype=np.int32).reshape(t, 4 * ng)


def _case_serial(guest: Guest, syms: dict, d: dict):
    """tt_vnni_run_serial (ternary) / tt_vnni_{i8,i4,b1}_run_serial: a whole matrix
    through the route's chunking and epilogue; float outputs, or raw int32 dots (``raw``)."""
    import numpy as np

    kind = d["kind"]
    if kind == "ternary":
        n, kb, m, cg, raw = (int(v) for v in d["shape"])
    elif kind in ("int8", "binary"):
        n, k, kp, m, cg, raw = (int(v) for v in d["shape"])
    else:
        n, k, kp, g, m, cg = (int(v) for v in d["shape"])
        raw = 0
    res = guest.alloc(4 * m * n)
    out, dots = (0, res) if raw else (res, 0)
    bias = guest.put(d["bias"]) if d["bias"].size else 0
    w, xq, xs, ldx = guest.put(d["w"]), guest.put(d["xq"]), guest.put(d["xs"]), d["xq"].shape[1]
    if kind == "ternary":
        guest.call(syms["tt_vnni_run_serial"], w, n, kb, guest.put(d["wscale"]), bias, xq, ldx, m, xs,
                   guest.put(d["sx"]), out, dots, cg)
    elif kind == "binary":
        guest.call(syms["tt_vnni_b1_run_serial"], w, n, k, kp, guest.put(d["wscale"]), bias, xq, ldx, m, xs,
                   guest.put(d["sx"]), out, dots, cg)
    elif kind == "int8":
        guest.call(syms["tt_vnni_i8_run_serial"], w, n, k, kp, guest.put(d["wscale"]), bias, guest.alloc(4 * n), xq,
                   ldx, m, xs, out, dots, cg)
    else:
        guest.call(syms["tt_vnni_i4_run_serial"], w, n, k, kp, g, guest.put(d["gscale"]), bias, xq, ldx, m, xs, out,
                   cg)
    return np.frombuffer(guest.read(res, 4 * m * n), dtype=np.int32 if raw else np.float32).reshape(m, n)


def _job(guest: Guest, syms: dict, job: dict, workdir: Path) -> dict:
    """``job["kind"]``: "has_vnni" -> tt_has_avx512vnni(); "dots" / "serial" -> :func:`_case_dots` /
    :func:`_case_serial` over the cases of the .npz file ``job["cases"]`` (arrays ``{name}{i}`` for
    case i; serial cases name their weight kind), outputs ``r{i}`` written to ``job["out"]``."""
    import numpy as np

    if job["kind"] == "has_vnni":
        return {"has_vnni": int(guest.call(syms["tt_has_avx512vnni"]) & 0xFFFFFFFF)}
    run = {"dots": _case_dots, "serial": _case_serial}[job["kind"]]
    data = np.load(job["cases"])
    cases: dict[int, dict] = {i: {} for i in range(int(data["n"]))}
    for key in data.files:
        m = re.fullmatch(r"([a-z]+)(\d+)", key)
        if m:
            cases[int(m.group(2))][m.group(1)] = data[key]
    out = {}
    for i, case in cases.items():
        case["kind"] = str(case.get("kind", "ternary"))
        out[f"r{i}"] = run(guest, syms, case)
    np.savez(job["out"], **out)
    return {"cases": len(out)}


def _main(argv: list[str]) -> int:
    if argv[0] == "--probe":
        _import_bochscpu(Path(argv[1]))
        return 0
    spec = json.loads(Path(argv[0]).read_text())
    workdir = Path(argv[0]).parent
    b = _import_bochscpu(workdir)
    index, brand = MODELS[spec["model"]]
    _set_model(b, index)
    guest = Guest(b, spec["xcr0"])
    helper = _compile(_BRAND, workdir / "emu_brand.so", ["-shared", "-fPIC", "-O2", "-nostdlib"])
    base = 0x2000_0000
    hsyms = guest.load_elf(helper, base)
    buf = guest.alloc(64)
    guest.call(hsyms["tt_emu_brand"], buf)
    got = guest.read(buf, 48).split(b"\0")[0].decode(errors="replace").strip()
    if brand not in got:
        raise RuntimeError(f"Bochs model {index} reports {got!r}, expected {brand!r}")
    syms = guest.load_elf(Path(spec["lib"]))
    print(json.dumps({"brand": got, **_job(guest, syms, spec["job"], workdir)}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
