/** What the results were measured on: CPU, cores, memory, kernel, tool versions, git commit. */
import { readFileSync } from 'node:fs';
import { availableParallelism, cpus, loadavg, release, totalmem } from 'node:os';
import { run } from './proc.js';

export interface MachineInfo {
  cpu: { model: string; cores: number; mhz: number | null; flags: string[] };
  memoryGiB: number;
  kernel: string;
  /** 1-minute load average when the run started (other work on the machine makes results noisy). */
  loadAtStart: number;
  versions: { node: string; nix: string; openssh: string; sshd: string };
  git: { commit: string; branch: string; dirty: boolean };
}

async function out(cmd: string, args: string[], cwd?: string): Promise<string> {
  try {
    const r = await run(cmd, args, { allowFail: true, cwd, timeoutMs: 10_000 });
    return `${r.stdout}${r.stderr}`.trim();
  } catch {
    return 'unknown';
  }
}

export async function machineInfo(repo: string): Promise<MachineInfo> {
  const c = cpus();
  let flags: string[] = [];
  try {
    const m = /^flags\s*:\s*(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'));
    flags = (m?.[1] ?? '').split(' ').filter((f) => ['aes', 'avx2', 'sha_ni', 'vaes', 'avx512f'].includes(f));
  } catch {}
  const status = await out('git', ['status', '--porcelain', '--untracked-files=no'], repo);
  return {
    cpu: { model: c[0]?.model ?? 'unknown', cores: availableParallelism(), mhz: c[0]?.speed ?? null, flags },
    memoryGiB: Math.round((totalmem() / 2 ** 30) * 10) / 10,
    kernel: release(),
    loadAtStart: Math.round(loadavg()[0]! * 100) / 100,
    versions: {
      node: process.version,
      nix: (await out('nix', ['--version'])).split('\n')[0]!,
      openssh: (await out('ssh', ['-V'])).split('\n')[0]!,
      // biome-ignore lint/suspicious/noTemplateCurlyInString: a dpkg-query format, not a template
      sshd: `openssh-server ${await out('dpkg-query', ['-W', '-f', '${Version}', 'openssh-server'])}`,
    },
    git: {
      commit: await out('git', ['rev-parse', 'HEAD'], repo),
      branch: await out('git', ['rev-parse', '--abbrev-ref', 'HEAD'], repo),
      dirty: status.length > 0 && status !== 'unknown',
    },
  };
}
