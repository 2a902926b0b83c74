// The seed article's "Basic Example: Clustering a Node Server", as printed
// there (shared/seed, "Scaling Node.js with Clustering"). It is the Node
// cluster baseline in BENCHMARKS.md (benches/fronts.sh runs it with
// NODE_CLUSTER_SCHED_POLICY=rr and =none) and the app herd must later run
// unmodified, so it carries no herd-specific code.
//
// One change from the seed: the port is `process.env.PORT || 3000` instead
// of a literal 3000, so a benchmark can pick a free port. With PORT unset it
// behaves exactly as the seed's code.
const cluster = require('cluster');
const http = require('http');
const os = require('os');

const numCPUs = os.cpus().length;

if (cluster.isPrimary) {
  console.log(`Master ${process.pid} is running`);

  // Fork workers.
  for (let i = 0; i < numCPUs; i++) {
    cluster.fork();
  }

  cluster.on('exit', (worker) => {
    console.log(`Worker ${worker.process.pid} died`);
    cluster.fork(); // Auto-restart
  });

} else {
  // Workers share the same TCP connection
  http.createServer((req, res) => {
    res.end(`Handled by worker ${process.pid}`);
  }).listen(process.env.PORT || 3000);

  console.log(`Worker ${process.pid} started`);
}
