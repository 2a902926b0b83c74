// Preloaded by benches/scale.sh (`node -r` this file) into the seed's
// unmodified cluster example, workers/node/cluster-server.js, which forks
// os.cpus().length workers: with NODE_WORKERS=N set, os.cpus() reports N
// CPUs, so the primary forks N workers whatever the machine has. The
// workers inherit the -r (cluster.fork passes process.execArgv) and see the
// same N, which they never use. Nothing else changes.
const os = require('os');

const wanted = Number(process.env.NODE_WORKERS);
if (Number.isInteger(wanted) && wanted > 0) {
  const real = os.cpus();
  os.cpus = () => Array.from({ length: wanted }, (_, i) => real[i % real.length]);
}
