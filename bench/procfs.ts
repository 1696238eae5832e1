/** Reading /proc: a process's memory (VmRSS/VmHWM), resetting its peak, and the processes of a mount namespace. */
import { readdirSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs';

export interface MemInfo {
  rssKiB: number;
  hwmKiB: number;
}

export function memOf(pid: number): MemInfo | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return undefined;
  }
  const get = (key: string) => {
    const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text);
    return m ? Number(m[1]) : 0;
  };
  return { rssKiB: get('VmRSS'), hwmKiB: get('VmHWM') };
}

/** Reset the peak-RSS counter (VmHWM) of a process (`echo 5 > clear_refs`, needs root or the same user). */
export function resetPeak(pid: number): boolean {
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, '5');
    return true;
  } catch {
    return false;
  }
}

export function mountNsOf(pid: number): string | undefined {
  try {
    return readlinkSync(`/proc/${pid}/ns/mnt`);
  } catch {
    return undefined;
  }
}

export function commOf(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return '';
  }
}

/** Every descendant of `pid` (children of all its threads, recursively), via /proc/<pid>/task/<tid>/children. */
export function descendantsOf(pid: number): number[] {
  const out: number[] = [];
  const todo = [pid];
  while (todo.length > 0) {
    const p = todo.pop()!;
    let tids: string[];
    try {
      tids = readdirSync(`/proc/${p}/task`);
    } catch {
      continue;
    }
    for (const tid of tids) {
      let kids: string;
      try {
        kids = readFileSync(`/proc/${p}/task/${tid}/children`, 'utf8');
      } catch {
        continue;
      }
      for (const k of kids.split(' ')) {
        if (k.trim() === '') continue;
        const c = Number(k);
        out.push(c);
        todo.push(c);
      }
    }
  }
  return out;
}

/** Every pid whose mount namespace is `ns`. */
export function pidsInMountNs(ns: string): number[] {
  const out: number[] = [];
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    const pid = Number(e);
    if (mountNsOf(pid) === ns) out.push(pid);
  }
  return out;
}

/**
 * Samples memory while a workload runs: the peak VmRSS seen for one pid (buildbox) or the largest single process among
 * a changing set (the reference box's per-connection nix-store / nix-daemon processes).
 */
export class RssSampler {
  private timer: NodeJS.Timeout | undefined;
  peakRssKiB = 0;
  samples = 0;

  constructor(
    private readonly pids: () => number[],
    private readonly intervalMs = 25,
  ) {}

  start(): void {
    this.sample();
    this.timer = setInterval(() => this.sample(), this.intervalMs);
  }

  sample(): void {
    for (const pid of this.pids()) {
      const m = memOf(pid);
      if (!m) continue;
      this.samples++;
      // VmHWM catches peaks between samples (for processes whose peak was reset, or that are new).
      const v = Math.max(m.rssKiB, m.hwmKiB);
      if (v > this.peakRssKiB) this.peakRssKiB = v;
    }
  }

  stop(): number {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    this.sample();
    return this.peakRssKiB;
  }
}

const CLK_TCK = 100;

/** utime, stime, cutime and cstime of a process in seconds (fields 14–17 of proc(5)'s stat), or undefined if gone. */
function cpuTimesOf(pid: number | 'self'): [number, number, number, number] | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // Fields after the command start at state (3); utime is field 14, i.e. index 11 here.
    return [f[11], f[12], f[13], f[14]].map((x) => Number(x) / CLK_TCK) as [number, number, number, number];
  } catch {
    return undefined;
  }
}

/** CPU seconds of a process and its reaped descendants (utime + stime + cutime + cstime), or 0 if it is gone. */
export function cpuSecondsOf(pid: number): number {
  const t = cpuTimesOf(pid);
  return t ? t[0] + t[1] + t[2] + t[3] : 0;
}

/** CPU seconds of this process's reaped children (and their reaped descendants): cutime + cstime. */
export function reapedChildrenCpuSeconds(): number {
  const t = cpuTimesOf('self');
  return t ? t[2] + t[3] : 0;
}
