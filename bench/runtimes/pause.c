/* chainbench pause: holds a pod's namespaces open.
 *
 * Sleeps in pause() forever; as PID 1 of a pod PID namespace it reaps orphans (SIGCHLD);
 * exits 0 on SIGINT/SIGTERM.  A PID 1 ignores signals it has no handler for, so both handlers
 * are installed explicitly.  Built with `gcc -static -Os` so it runs in any rootfs.
 */
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig)
{
	(void)sig;
	_exit(0);
}

static void on_child(int sig)
{
	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

int main(int argc, char **argv)
{
	struct sigaction sa;

	if (argc > 1 && strcmp(argv[1], "-v") == 0) {
		static const char msg[] = "chainbench-pause 1\n";
		return write(1, msg, sizeof msg - 1) == (ssize_t)(sizeof msg - 1) ? 0 : 1;
	}
	memset(&sa, 0, sizeof sa);
	sigemptyset(&sa.sa_mask);
	sa.sa_handler = on_term;
	if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0)
		return 1;
	sa.sa_handler = on_child;
	sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
	if (sigaction(SIGCHLD, &sa, NULL) < 0)
		return 1;
	for (;;)
		pause();
	return 0;
}
