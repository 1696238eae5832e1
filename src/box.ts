/**
 * Assembling a running box from its config: host key, signing key, store (wiped unless persist), users registry
 * (reloaded on change or followed from git), scheduler, builder, the SSH front door, the unix socket for the OpenSSH
 * front door, and the HTTP status server.
 */
import { existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import type { Logger } from 'pino';
import { Builder } from './build.js';
import { boxInfo } from './client-config.js';
import { type Config, systemsOf } from './config.js';
import { runCommand } from './dispatch.js';
import { type HostKey, loadOrCreateHostKey } from './host-key.js';
import { Registry } from './registry-runtime.js';
import { processesOfUids } from './sandbox.js';
import { Scheduler } from './scheduler.js';
import { SESSION_SOCKET_FILE, type SessionSocketHandle, startSessionSocket } from './session-socket.js';
import { loadPublicKey, loadSecretKey, type PublicKey, SecretKey, savePublicKey, saveSecretKey } from './signing.js';
import { type SshServerHandle, startSshServer } from './ssh-server.js';
import { type StatusServerHandle, startStatusServer } from './status-server.js';
import { removeTreeSync, Store } from './store.js';

export interface Box {
  config: Config;
  hostKey: HostKey;
  signingKey: SecretKey;
  store: Store;
  registry: Registry;
  scheduler: Scheduler;
  builder: Builder;
  ssh: SshServerHandle;
  /** `<stateDir>/session.sock`, where the OpenSSH front door's forced command (`buildbox session`) connects. */
  sessions: SessionSocketHandle;
  status: StatusServerHandle | null;
  port: number;
  logger: Logger;
  startedAt: number;
  close(): Promise<void>;
}

export const SIGNING_KEY_FILE = 'signing-key.sec';

/** The box's signing key for public outputs it built: `buildbox-<host>-1`, generated once next to the host key. */
export function loadOrCreateSigningKey(stateDir: string, hostName: string): SecretKey {
  mkdirSync(stateDir, { recursive: true });
  const file = join(stateDir, SIGNING_KEY_FILE);
  if (!existsSync(file)) {
    const key = SecretKey.generate(`buildbox-${hostName}-1`);
    saveSecretKey(file, key);
    savePublicKey(join(stateDir, 'signing-key.pub'), key.publicKey);
  }
  return loadSecretKey(file);
}

export function readSigningPublicKey(stateDir: string): PublicKey | undefined {
  const file = join(stateDir, 'signing-key.pub');
  return existsSync(file) ? loadPublicKey(file) : undefined;
}

/**
 * Builds run as unprivileged slot uids, which must reach the store objects and build directories under the state
 * dir: every parent directory needs search permission for others. Returns the first one that lacks it.
 */
export function unreachableParent(dir: string): string | undefined {
  let d = resolve(dir);
  for (;;) {
    try {
      if ((statSync(d).mode & 0o001) === 0) return d;
    } catch {
      return d;
    }
    const up = dirname(d);
    if (up === d) return undefined;
    d = up;
  }
}

/**
 * Why the build uids `base` … `base + count - 1` are not free for the box: an account in `passwd` has one, or a process
 * runs as one (another box with an overlapping range, or leftovers of a crashed one). After every build the box kills
 * every process of the slot's uid, so the range must belong to nothing else.
 */
export function buildUidConflict(base: number, count: number, passwd = '/etc/passwd'): string | undefined {
  const inRange = (u: number): boolean => u >= base && u < base + count;
  let accounts = '';
  try {
    accounts = readFileSync(passwd, 'utf8');
  } catch {
    // no passwd file to check (accounts from other name services are not seen either)
  }
  for (const line of accounts.split('\n')) {
    const [name, , uid] = line.split(':');
    if (uid !== undefined && /^\d+$/.test(uid) && inRange(Number(uid))) {
      return `uid ${uid} is the account '${name}' in ${passwd}`;
    }
  }
  const procs = processesOfUids(inRange);
  if (procs.length > 0) {
    const pids = procs.slice(0, 5).map((p) => p.pid);
    return (
      `processes run as uid ${procs[0]!.uid} (pid ${pids.join(', ')}${procs.length > 5 ? ', …' : ''}): another ` +
      'buildbox with an overlapping range, or leftovers of a crashed one'
    );
  }
  return undefined;
}

export async function startBox(config: Config, logger: Logger): Promise<Box> {
  const uidConflict = buildUidConflict(config.buildUidBase, config.maxJobs);
  if (uidConflict) {
    const last = config.buildUidBase + config.maxJobs - 1;
    throw new Error(
      `the build uids ${config.buildUidBase}–${last} (build-uid-base, max-jobs) must be reserved for this box, ` +
        `but ${uidConflict}`,
    );
  }
  mkdirSync(config.stateDir, { recursive: true, mode: 0o755 });
  const blocked = unreachableParent(config.stateDir);
  if (blocked) {
    throw new Error(
      `the state directory ${config.stateDir} is not reachable by the unprivileged build users: ${blocked} is not ` +
        'searchable by others (chmod o+x it, or use a state dir such as /var/lib/buildbox with --state-dir)',
    );
  }
  // Zero persistence: besides the store (wiped by Store.open), build logs go unless `persist`; build directories
  // left by a crash always go. Host key, signing key and config survive.
  if (!config.persist) removeTreeSync(join(config.stateDir, 'logs'));
  removeTreeSync(join(config.stateDir, 'builds'));
  const hostKey = loadOrCreateHostKey(config.stateDir);
  const signingKey = loadOrCreateSigningKey(config.stateDir, config.hostName);
  const registry = await Registry.start(config, logger.child({ part: 'registry' }));
  const store = Store.open({
    stateDir: config.stateDir,
    persist: config.persist,
    trustedPublicKeys: config.trustedPublicKeys,
    signingKey,
    shareContentAddressed: config.shareContentAddressed,
    knownUsers: (u) => registry.knownUsers().has(u),
    logger: logger.child({ part: 'store' }),
  });
  // Disk-budget GC: by reachability from live sessions' and builds' roots and recent use, never what a build holds.
  let gcRunning = false;
  const gcTimer = setInterval(
    () => {
      if (gcRunning) return;
      gcRunning = true;
      store
        .gc({ retentionSeconds: config.retention, maxBytes: config.maxStoreSize || undefined })
        .then((r) => {
          if (r.deletedPaths > 0) logger.info(r, 'garbage collected');
        })
        .catch((e: Error) => logger.error({ err: e.message }, 'garbage collection failed'))
        .finally(() => {
          gcRunning = false;
        });
    },
    Math.max(10, Math.min(config.retention, 300)) * 1000,
  );
  gcTimer.unref();
  const scheduler = new Scheduler({
    maxJobs: config.maxJobs,
    uidBase: config.buildUidBase,
    userLimit: (u) => registry.jobsLimit(u),
  });
  const builder = new Builder({
    store,
    scheduler,
    config: {
      system: config.system,
      extraPlatforms: config.extraPlatforms,
      features: config.supportedFeatures,
      mandatoryFeatures: config.mandatoryFeatures,
      cores: config.cores,
      maxSilentTime: config.maxSilentTime,
      buildTimeout: config.buildTimeout,
      maxLogSize: config.maxLogSize,
      logDir: join(config.stateDir, 'logs'),
      buildDirRoot: join(config.stateDir, 'builds'),
    },
    logger: logger.child({ part: 'build' }),
  });
  const ctx = {
    store,
    builder,
    logger,
    // What `buildbox-info` answers (client-config --host, doctor).
    info: (user: string) =>
      boxInfo(
        {
          hostName: config.hostName,
          systems: systemsOf(config),
          maxJobs: config.maxJobs,
          supportedFeatures: config.supportedFeatures,
          mandatoryFeatures: config.mandatoryFeatures,
          hostKey,
          signingKey: signingKey.publicKey,
        },
        user,
        registry.jobsLimit(user),
      ),
  };
  const ssh = await startSshServer({
    hostKey,
    listen: config.listen,
    port: config.port,
    isAuthorized: (user, algo, blob) => registry.isAuthorized(user, algo, blob),
    exec: (req) => runCommand(ctx, req),
    authTimeoutMs: config.authTimeout * 1000,
    maxConnections: config.maxConnections,
    logger: logger.child({ part: 'ssh' }),
  });
  // The OpenSSH front door: sshd authenticates (buildbox authorized-keys) and runs `buildbox session USER`, which
  // connects here; the user must still be in the registry now.
  const sessions = await startSessionSocket(
    join(config.stateDir, SESSION_SOCKET_FILE),
    async (req) => {
      if (registry.knownUsers().has(req.user)) return runCommand(ctx, req);
      req.stderr.write(`buildbox: there is no user ${req.user} in the box's registry\n`);
      return 1;
    },
    logger.child({ part: 'session-socket' }),
  ).catch(async (e: unknown) => {
    await ssh.close();
    throw e;
  });
  const startedAt = Date.now();
  const box: Box = {
    config,
    hostKey,
    signingKey,
    store,
    registry,
    scheduler,
    builder,
    ssh,
    sessions,
    status: null,
    port: ssh.port,
    logger,
    startedAt,
    close: async () => {
      clearInterval(gcTimer);
      await ssh.close();
      await sessions.close();
      await box.status?.close();
      await builder.close?.();
      registry.close();
      store.close();
    },
  };
  if (config.statusPort !== null) {
    box.status = await startStatusServer(box, config.statusListen, config.statusPort);
  }
  logger.info(
    {
      listen: `${ssh.address}:${ssh.port}`,
      fingerprint: hostKey.fingerprint,
      signingKey: signingKey.publicKey.toString(),
      stateDir: config.stateDir,
      persist: config.persist,
      users: registry.userCount(),
    },
    'buildbox is up',
  );
  return box;
}
